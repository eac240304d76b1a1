"""tsam_core: Tilted SAM (TSAM), SAM and ERM for PyTorch, flatness metrics, data and training.

from tsam_core import TSAM
opt = TSAM(model.parameters(), torch.optim.SGD, t=20.0, rho=0.1, samples=3, lr=0.05)
loss = opt.step_on_batch(model, loss_fn, inputs, targets)
"""

from tsam_core.sam import SAM
from tsam_core.tsam import TSAM

__all__ = ["SAM", "TSAM"]
__version__ = "0.1.0"
