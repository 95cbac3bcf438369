"""Every public name of ``gpu_ann`` has a numpydoc docstring that documents its parameters."""

import inspect

import pytest

import gpu_ann

PUBLIC = [name for name in gpu_ann.__all__ if name != "__version__"]


def _has_parameters(func) -> bool:
    """Whether ``func`` takes anything besides ``self`` / ``cls``."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins (an exception's inherited __init__)
        return False
    return any(name not in ("self", "cls") for name in params)


def _check_function(func, label: str) -> None:
    doc = inspect.getdoc(func)
    assert doc, f"{label} has no docstring"
    if _has_parameters(func):
        assert "Parameters" in doc, f"{label} takes parameters but its docstring has no Parameters section"


def _own_methods(cls):
    """Public methods (plain, class and static) defined in gpu_ann by ``cls`` or its gpu_ann bases."""
    seen = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("gpu_ann"):
            continue
        for name, attr in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            if isinstance(attr, classmethod | staticmethod):
                attr = attr.__func__
            if inspect.isfunction(attr):
                yield name, getattr(cls, name)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_is_documented(name):
    obj = getattr(gpu_ann, name)
    if inspect.isclass(obj):
        assert inspect.getdoc(obj), f"class {name} has no docstring"
        if _has_parameters(obj):
            docs = (obj.__doc__ or "") + (obj.__init__.__doc__ or "")
            assert "Parameters" in docs, f"class {name}: constructor parameters are not documented"
        for method_name, method in _own_methods(obj):
            _check_function(method, f"{name}.{method_name}")
    else:
        assert inspect.isfunction(obj), f"{name} is neither a class nor a function"
        _check_function(obj, name)
