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


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("mobilevit_xxs", {"dims": 1e9}, r"MobileViTConfig\.dims must be a list \(like \(64, "),
        ("mobilenet_v1_100", {"act": 3}, r"MobileNetV1Config\.act must be a string"),
        ("mobilenet_v1_100", {"depthwise": 1}, r"depthwise must be true or false \(like True\)"),
        ("mobilenet_v1_100", {"num_classes": 2.5}, r"num_classes must be an integer \(like 1000\)"),
        ("longformer_base_4096", {"window": "8"}, r"window must be an integer or a list"),
    ],
)  # fmt: skip
def test_an_override_of_the_wrong_kind_names_the_field_and_the_kind(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        archopt.create_model(name, **overrides)


def test_a_model_too_large_for_the_machine_is_refused_before_any_allocation():
    from archopt.errors import ResourceError

    too_wide = r"model 'mobilenet_v1_100' with \{'width_mult': 10000\.0\}.*GiB"
    with pytest.raises(ResourceError, match=too_wide):
        archopt.create_model("mobilenet_v1_100", width_mult=1e4)
    with pytest.raises(ValueError, match=r"a layer's size does not fit in 64 bits"):
        archopt.create_model("mobilenet_v1_100", width_mult=1e30)
    # unions and sequences where the annotation allows them; the models build as before
    assert archopt.create_model("longformer_base_4096", window=[8] * 12, num_layers=12)
    assert archopt.create_model("mobilenet_v1_100", width_mult=1).config.width_mult == 1


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
