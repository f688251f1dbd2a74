"""spark-submit entry for the cross_locale stage.

spark-submit --py-files dist/prodvec-*.whl jobs/cross_locale.py [--conf cluster] [key.sub=value ...]
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["cross_locale", *sys.argv[1:]]))
