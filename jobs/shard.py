"""spark-submit entry for the shard stage.

spark-submit --py-files dist/prodvec-*.whl jobs/shard.py [--conf cluster] [key.sub=value ...]
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", *sys.argv[1:]]))
