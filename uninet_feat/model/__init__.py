"""UniNet, the pure torch model: teachers, bottleneck with MEM, student decoder, DFS and losses."""
from .bottleneck import Bottleneck
from .dfs import DFS
from .losses import pair_loss, pair_loss_reference
from .mem import MEMBlock, RepConv, reparameterize
from .student import StudentDecoder
from .uninet import DEFAULTS, UniNet, UniNetOutput

__all__ = ["UniNet", "UniNetOutput", "DEFAULTS", "Bottleneck", "MEMBlock", "RepConv", "reparameterize",
           "StudentDecoder", "DFS", "pair_loss", "pair_loss_reference"]
