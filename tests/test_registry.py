import pytest
from torch import nn

import archopt
from archopt.registry import list_models, model_info, register_model, unregister_model


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
        unregister_model("tiny_test_model")


def test_every_entry_says_its_task_and_default_input():
    for name in list_models():
        info = model_info(name)
        assert info.task in ("image", "lm", "encoder"), name
        if info.task == "image":
            assert len(info.default_input) == 3 and info.default_input[0] == 3, name
        else:
            assert len(info.default_input) == 1 and info.default_input[0] > 0, name
    assert list_models(task="lm") == ["llama-tiny", "smollm2-135m"]
    assert model_info("mobilevit_s").default_input == (3, 256, 256)
    assert model_info("smollm2-135m").pretrained is not None
    assert model_info("llama-tiny").pretrained is None


def test_pretrained_without_packaged_weights_names_those_that_have_them():
    with pytest.raises(ValueError, match=r"no packaged weights.*smollm2-135m"):
        archopt.create_model("mobilenet_v1_100", pretrained=True)
    with pytest.raises(ValueError, match="needs pretrained=True"):
        archopt.create_model("llama-tiny", weights="int8")
