"""spark-submit entry for the optional image_features stage (a no-op unless
image_features.enabled).

spark-submit --py-files dist/prodvec-*.whl jobs/image_features.py [--conf cluster] [key.sub=value ...]
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["image_features", *sys.argv[1:]]))
