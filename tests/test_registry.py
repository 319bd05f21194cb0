import pytest

from pvtune.registry import Registry


def test_register_and_get():
    reg: Registry[str, int] = Registry("thing")
    reg.register("a", 1)
    assert reg.get("a") == 1
    assert "a" in reg and reg.names() == ["a"]


def test_duplicate_refused_unless_overwrite():
    reg: Registry[str, int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    reg.register("a", 2, overwrite=True)
    assert reg.get("a") == 2


def test_unknown_key_lists_known():
    reg: Registry[str, int] = Registry("thing")
    reg.register("alpha", 1)
    with pytest.raises(KeyError, match="unknown thing 'beta'; known: alpha"):
        reg.get("beta")


def test_unregister_removes_the_entry():
    reg: Registry[str, int] = Registry("thing")
    reg.register("a", 1)
    assert reg.unregister("a") == 1
    assert "a" not in reg
    reg.register("a", 2)  # free again
