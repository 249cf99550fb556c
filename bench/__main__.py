"""``python -m bench``: see bench/run.py and bench/README.md; ``python -m bench cluster``:
bench/cluster.py; ``python -m bench refusals``: bench/refusals.py."""

import sys

if sys.argv[1:2] == ["cluster"]:
    from .cluster import main as cluster_main

    sys.exit(cluster_main(sys.argv[2:]))
if sys.argv[1:2] == ["refusals"]:
    from .refusals import main as refusals_main

    sys.exit(refusals_main(sys.argv[2:]))

from .run import main

sys.exit(main())
