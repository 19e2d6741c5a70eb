"Everything a user needs: `from fasterai_lr.all import *`"
from .factorize import *
from .layers import *
from .decompose import *
from .ranks import *
from .calibrate import *
from .callback import *
from .export import *
