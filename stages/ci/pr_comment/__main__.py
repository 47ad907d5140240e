"""python -m stages.ci.pr_comment"""

import sys

from .comment import main

sys.exit(main())
