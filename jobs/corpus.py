"""spark-submit entry for the corpus stage.

spark-submit --py-files dist/prodvec-*.whl jobs/corpus.py [--conf cluster] [key.sub=value ...]
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["corpus", *sys.argv[1:]]))
