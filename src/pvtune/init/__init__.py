"""Layer-wise initialisation of compressed weights: RTN, GPTQ, AQLM, JLCM."""

from pvtune.init.aqlm import AQLMInitConfig, aqlm_init
from pvtune.init.gptq import GPTQConfig, gptq_init
from pvtune.init.jlcm import JLCMInitConfig, jlcm_init
from pvtune.init.registry import INIT_METHODS, InitMethod, get_init, register_init
from pvtune.init.rtn import RTNConfig, rtn_init

__all__ = [
    "INIT_METHODS",
    "AQLMInitConfig",
    "GPTQConfig",
    "InitMethod",
    "JLCMInitConfig",
    "RTNConfig",
    "aqlm_init",
    "get_init",
    "gptq_init",
    "jlcm_init",
    "register_init",
    "rtn_init",
]
