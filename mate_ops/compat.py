"""Opt-in import aliases: make ``import flash_attn_interface`` and ``import flash_mla`` load
mate_ops' drop-in modules.

Nothing happens on ``import mate_ops`` or ``import mate_ops.compat``; call
:func:`install_aliases` once, before the code that imports the original packages::

    import mate_ops.compat
    mate_ops.compat.install_aliases()

    import flash_mla                         # -> mate_ops.flash_mla
    from flash_attn_interface import flash_attn_func   # -> mate_ops.flash_attn_interface

Aliases (registered in ``sys.modules``):

================================  =================================
``flash_attn_interface``          :mod:`mate_ops.flash_attn_interface` (FA3's hopper interface)
``flash_mla``                     :mod:`mate_ops.flash_mla` (DeepSeek FlashMLA)
``flash_mla.flash_mla_interface`` :mod:`mate_ops.flash_mla` (FlashMLA's submodule of the same API)
================================  =================================

Never shadowing a real package silently: an alias whose name is already imported (another
module in ``sys.modules``) or importable (found on ``sys.path``) is a conflict.

* ``force=False`` (default): :func:`install_aliases` raises :class:`AliasConflictError`
  (an ``ImportError``) naming the conflicting modules, and installs nothing.
* ``force=True``: the aliases are installed anyway, a :class:`UserWarning` names what is
  shadowed, and a module that was already imported is kept so that
  :func:`uninstall_aliases` puts it back.

``names`` picks a subset (e.g. ``install_aliases(names=["flash_mla"])`` when the real FA3 is
installed). :mod:`mate_ops.flash_attn_interface` is imported only inside
:func:`install_aliases`; if it is not part of this mate_ops build, its alias is skipped with
a warning (asking for it explicitly with ``names`` raises instead).

:func:`uninstall_aliases` removes the aliases this module installed (only entries that still
point at mate_ops' modules) and restores modules displaced with ``force=True``.
"""
import importlib
import importlib.util
import sys
import warnings
from typing import Dict, Iterable, Optional

__all__ = ["ALIASES", "AliasConflictError", "install_aliases", "uninstall_aliases", "installed_aliases"]

#: alias name -> mate_ops module providing it
ALIASES: Dict[str, str] = {
    "flash_attn_interface": "mate_ops.flash_attn_interface",
    "flash_mla": "mate_ops.flash_mla",
}
# Submodules installed together with their parent alias.
_SUBMODULES: Dict[str, Dict[str, str]] = {
    "flash_mla": {"flash_mla.flash_mla_interface": "mate_ops.flash_mla"},
}

_installed: Dict[str, object] = {}  # sys.modules name -> the mate_ops module we put there
_displaced: Dict[str, object] = {}  # sys.modules name -> the module that was there before (force=True)


class AliasConflictError(ImportError):
    """An alias name is already taken by a real, imported or importable module."""


def _conflict(name: str, target) -> Optional[str]:
    """Why ``name`` cannot be aliased without shadowing something, or None."""
    present = sys.modules.get(name)
    if present is not None:
        if present is target:
            return None
        return f"{name!r} is already imported ({getattr(present, '__file__', None) or present!r})"
    if "." in name:
        return None  # a submodule: its parent's check decides
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        return f"{name!r} is importable from {spec.origin or spec.name}"
    return None


def installed_aliases() -> Dict[str, str]:
    """The aliases currently installed by this module: name -> mate_ops module name."""
    return {n: m.__name__ for n, m in _installed.items() if sys.modules.get(n) is m}


def install_aliases(force: bool = False, names: Optional[Iterable[str]] = None) -> Dict[str, str]:
    """Register mate_ops' drop-in modules under the original packages' import names.

    Args:
        force: shadow a real ``flash_attn_interface`` / ``flash_mla`` that is already imported
            or importable (with a ``UserWarning``) instead of raising.
        names: the aliases to install (keys of :data:`ALIASES`); default: all of them.

    Returns:
        The aliases installed by this call and earlier ones: ``{name: mate_ops module name}``.

    Raises:
        AliasConflictError: a name is taken by another module and ``force`` is False
            (nothing is installed then).
        ValueError: an unknown name in ``names``.
        ModuleNotFoundError: ``names`` asks for ``flash_attn_interface`` and this build has
            no ``mate_ops.flash_attn_interface``.
    """
    explicit = names is not None
    wanted = list(ALIASES) if names is None else list(names)
    unknown = [n for n in wanted if n not in ALIASES]
    if unknown:
        raise ValueError(f"unknown alias name(s) {unknown}; known: {sorted(ALIASES)}")

    targets = {}
    for name in wanted:
        try:
            targets[name] = importlib.import_module(ALIASES[name])
        except ModuleNotFoundError as e:
            if e.name != ALIASES[name] or explicit:
                raise
            warnings.warn(f"mate_ops.compat: {ALIASES[name]} is not available in this mate_ops build; "
                          f"the {name!r} alias is not installed", UserWarning, stacklevel=2)
    plan = {}
    for name, module in targets.items():
        plan[name] = module
        for sub, sub_target in _SUBMODULES.get(name, {}).items():
            plan[sub] = importlib.import_module(sub_target)

    conflicts = {n: why for n, m in plan.items() if (why := _conflict(n, m)) is not None}
    if conflicts and not force:
        raise AliasConflictError(
            "mate_ops.compat.install_aliases: refusing to shadow real modules: " + "; ".join(conflicts.values())
            + ". Pass force=True to shadow them anyway, or names=[...] to install only the other aliases.")
    if conflicts:
        warnings.warn("mate_ops.compat.install_aliases(force=True) shadows: " + "; ".join(conflicts.values()),
                      UserWarning, stacklevel=2)

    for name, module in plan.items():
        present = sys.modules.get(name)
        if present is not None and present is not module and name not in _displaced:
            _displaced[name] = present
        sys.modules[name] = module
        _installed[name] = module
    return installed_aliases()


def uninstall_aliases() -> None:
    """Undo :func:`install_aliases`: remove our ``sys.modules`` entries, restore displaced modules.

    An entry that no longer points at the module we installed (someone replaced it since)
    is left alone. Calling it when nothing is installed does nothing.
    """
    for name, module in list(_installed.items()):
        if sys.modules.get(name) is module:
            del sys.modules[name]
            if name in _displaced:
                sys.modules[name] = _displaced[name]
        _installed.pop(name, None)
        _displaced.pop(name, None)
