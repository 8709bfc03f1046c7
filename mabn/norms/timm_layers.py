"""The registry's norms as timm layers: ``norm_layer=`` for timm models whose blocks take a norm + activation.

timm's plain ``norm_layer`` models (ResNet, and torchvision's) call ``norm_layer(channels, device=, dtype=)``:
``recipe.ctor`` is that. Models built from ``ConvNormAct`` (RegNet, CSPNet, ...) resolve ``norm_layer`` through
``timm.layers.get_norm_act_layer`` to a norm + activation class, which they call with ``apply_act``,
``act_layer``, ``act_kwargs`` and ``drop_layer``; ``timm_norm_layer(recipe)`` is such a class for the recipe's
norm (``NormAct2d``: the norm, the drop layer, the activation; a norm that carries its own activation, FRN +
TLU or EvoNorm-S0, replaces it). It is registered as a norm + activation type in timm's lookup sets the way
timm's own are (nothing of timm changes for its own layers). timm is imported only here, when called.
"""

from __future__ import annotations

from torch import nn

from .convert import NormAct2d
from .protocol import layer as protocol_layer
from .registry import NormRecipe

_MADE: dict[int, tuple[NormRecipe, type]] = {}


def timm_norm_layer(recipe: NormRecipe) -> type:
    """A timm norm + activation class building ``recipe``'s norm, e.g.
    ``timm.create_model("regnetx_002", norm_layer=timm_norm_layer(build_norm("mabn", ctx)))``."""
    made = _MADE.get(id(recipe))
    if made is not None and made[0] is recipe:
        return made[1]
    from timm.layers import create_act, create_norm_act

    ctor = recipe.ctor

    def __init__(self, num_features: int, apply_act: bool = True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace: bool = True, drop_layer=None, device=None, dtype=None, **ignored):
        norm = ctor(num_features, device=device, dtype=dtype)
        layer = protocol_layer(norm)
        if layer.carries_activation and not apply_act:
            norm = norm.without_activation()  # the position timm leaves without activation
        if layer.carries_activation or not apply_act or act_layer is None:
            act = nn.Identity()
        else:
            act = create_act.get_act_layer(act_layer)
            act = act(inplace=inplace, **(act_kwargs or {})) if _takes_inplace(act) else act(**(act_kwargs or {}))
        NormAct2d.__init__(self, norm, act, drop_layer() if drop_layer is not None else None)

    name = f"{type(ctor(8)).__name__}Act"
    # timm's blocks reach into their norm (RegNet's zero_init_last: ``nn.init.zeros_(self.conv3.bn.weight)``)
    affine = {key: property(lambda self, key=key: getattr(self.norm, key)) for key in ("weight", "bias")}
    cls = type(name, (NormAct2d,), {"__init__": __init__, "__module__": __name__, **affine,
                                    "__doc__": f"{recipe.name} followed by timm's drop layer and activation."})
    create_norm_act._NORM_ACT_TYPES.add(cls)  # a norm + activation type, given act_layer (as BatchNormAct2d)
    create_norm_act._NORM_ACT_REQUIRES_ARG.add(cls)
    _MADE[id(recipe)] = (recipe, cls)  # the recipe kept alive: its id is not reused
    return cls


def _takes_inplace(act: type) -> bool:
    import inspect

    try:
        return "inplace" in inspect.signature(act).parameters
    except (TypeError, ValueError):
        return False
