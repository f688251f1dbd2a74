"""spark-submit entry for the clean stage.

spark-submit --py-files dist/prodvec-*.whl jobs/clean.py [--conf cluster] [key.sub=value ...]
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["clean", *sys.argv[1:]]))
