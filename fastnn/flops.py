"""Flop counts of fastnn's ops for torch.utils.flop_counter.FlopCounterMode (MFU accounting):
under a dispatch mode fastnn's calls are its torch.library ops (fastnn/ops.py), whose GEMMs run
inside them where the mode does not see them, so each op declares its own count. Each function gets
the shapes of the op's tensor arguments (the rest as they are), positionally as fastnn calls them."""
from __future__ import annotations

from torch.utils.flop_counter import register_flop_formula


def _linear_act_fwd(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * w_shape[1] * w_shape[0]


def _linear_act_bwd(dy_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    need_dx, need_dw = args[-3], args[-2]  # (..., need_dx, need_dw, need_db)
    return 2 * dy_shape[0] * dy_shape[1] * w_shape[1] * (int(need_dx) + int(need_dw))


def _linear_glu_fwd(x_shape, wg_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * x_shape[0] * wg_shape[1] * wg_shape[0]


def _linear_glu_bwd(dy_shape, x_shape, wg_shape, *args, out_shape=None, **kwargs) -> int:
    need_dx, need_dwg, need_dwu = args[-5], args[-4], args[-3]  # (..., dx, dwg, dwu, dbg, dbu)
    return 2 * dy_shape[0] * dy_shape[1] * wg_shape[1] * (2 * int(need_dx) + int(need_dwg) + int(need_dwu))


def register(act_fwd, act_bwd, glu_fwd, glu_bwd) -> None:
    """Declare the counts of one backend family's four ops (OpOverloadPackets)."""
    for op, formula in ((act_fwd, _linear_act_fwd), (act_bwd, _linear_act_bwd), (glu_fwd, _linear_glu_fwd),
                        (glu_bwd, _linear_glu_bwd)):
        register_flop_formula(op)(formula)
