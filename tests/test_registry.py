import pytest
from torch import nn

import archopt
from archopt.registry import _REGISTRY, register_model


def test_list_models_has_mobilenets_and_filters():
    names = archopt.list_models()
    assert names == sorted(names)
    for n in ("mobilenet_v1_100", "mobilenet_v1_075", "mobilenet_v1_050", "mobilenet_v1_025"):
        assert n in names
    assert "conv_mobilenet_v1_100" in names
    assert archopt.list_models("conv_*") == ["conv_mobilenet_v1_100"]
    assert archopt.list_models("nothing*") == []


def test_unknown_name_lists_closest():
    with pytest.raises(
        ValueError, match=r"unknown model 'mobilenet_v1_10'.*closest: mobilenet_v1_100"
    ):
        archopt.create_model("mobilenet_v1_10")


def test_unknown_override_names_the_fields():
    with pytest.raises(ValueError, match=r"unknown MobileNetV1Config field\(s\) \['widht_mult'\]"):
        archopt.create_model("mobilenet_v1_100", widht_mult=0.5)


def test_register_and_reject_duplicate():
    @register_model(name="tiny_test_model")
    def tiny(**kw):
        return nn.Linear(2, 2)

    try:
        assert isinstance(archopt.create_model("TINY_TEST_MODEL"), nn.Linear)
        with pytest.raises(ValueError, match="already registered"):
            register_model(lambda: nn.Identity(), name="tiny_test_model")
    finally:
        _REGISTRY.pop("tiny_test_model")
