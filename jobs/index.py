"""spark-submit entry for the index stage.

spark-submit --py-files dist/prodvec-*.whl jobs/index.py [--conf cluster] [key.sub=value ...]
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
