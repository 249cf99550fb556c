"""``python -m bench``: see bench/run.py and bench/README.md; ``python -m bench cluster``:
bench/cluster.py."""

import sys

if sys.argv[1:2] == ["cluster"]:
    from .cluster import main as cluster_main

    sys.exit(cluster_main(sys.argv[2:]))

from .run import main

sys.exit(main())
