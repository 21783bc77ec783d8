"""python -m sodec_jax.train --config FILE --workdir DIR [--config.a.b=v ...] [--print_config]"""

import sys

from sodec_jax.train.cli import main

sys.exit(main())
