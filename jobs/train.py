"""spark-submit entry for the train stage.

spark-submit --py-files dist/prodvec-*.whl jobs/train.py [--conf cluster] [key.sub=value ...]
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
