"""spark-submit entry for the embed stage.

spark-submit --py-files dist/prodvec-*.whl jobs/embed.py [--conf cluster] [key.sub=value ...]
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
