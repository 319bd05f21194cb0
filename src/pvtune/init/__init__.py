"""Layer-wise initialisation of compressed weights: RTN, GPTQ, AQLM."""

from pvtune.init.aqlm import AQLMInitConfig, aqlm_init
from pvtune.init.gptq import GPTQConfig, gptq_init
from pvtune.init.registry import INIT_METHODS, InitMethod, get_init, register_init
from pvtune.init.rtn import RTNConfig, rtn_init

__all__ = [
    "INIT_METHODS",
    "AQLMInitConfig",
    "GPTQConfig",
    "InitMethod",
    "RTNConfig",
    "aqlm_init",
    "get_init",
    "gptq_init",
    "register_init",
    "rtn_init",
]
