"""``python -m vlm2emb`` (so ``accelerate launch -m vlm2emb train ...`` works)."""

import sys

from vlm2emb.cli import main

sys.exit(main())
