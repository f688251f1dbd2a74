"""spark-submit entry for the evaluate stage.

spark-submit --py-files dist/prodvec-*.whl jobs/evaluate.py [--conf cluster] [key.sub=value ...]
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
