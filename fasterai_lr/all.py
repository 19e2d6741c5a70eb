"Everything a user needs: `from fasterai_lr.all import *` (the bundled-data demo is not in it: `fasterai_lr.cli`)"
from .factorize import *
from .core import *
from .layers import *
from .decompose import *
from .ranks import *
from .calibrate import *
from .callback import *
from .latency import *
from .evaluate import *
from .export import *
