"Everything a user needs: `from fasterai_lr.all import *`"
from .factorize import *
from .layers import *
from .decompose import *
from .ranks import *
from .calibrate import *
from .callback import *
from .latency import *
from .export import *
from .cli import digits_dls, digits_cnn, digits_learner   # the bundled-data example the tutorials use
