"""The keyword extras of attribute, checked once into OcclusionOptions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from captum_krypton import IncrementalOcclusion
from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.windows import WindowGrid
from captum_krypton.options import OcclusionOptions, check_strides
from tests import models


def test_defaults_are_attributes_defaults_and_frozen():
    options = OcclusionOptions.from_keywords()
    assert options == OcclusionOptions()
    assert options.approximation.exact and options.settings.self_check
    assert options.devices is None and options.first_pass.exact
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.engine = "captum"  # type: ignore[misc]


@pytest.mark.parametrize(
    "keywords, message",
    [
        (dict(engine="fast"), "engine must be"),
        (dict(tau=0), "tau must be in"),
        (dict(drilldown=1.5), "drilldown must be in"),
        (dict(drilldown=0.5, drilldown_factor=1), "drilldown_factor must be an integer"),
        (dict(target_ssim=1.0), "target_ssim must be in"),
        (dict(target_ssim=0.9, tau=0.5), "target_ssim chooses tau"),
        (dict(region=(0, 0, 4, 4), drilldown=0.5), "region computes the windows inside"),
        (dict(windows_per_batch=0), "windows_per_batch must be at least 1"),
        (dict(devices=[]), "devices must name at least one device"),
    ],
)
def test_bad_keywords_are_refused_with_attributes_messages(keywords, message):
    with pytest.raises(ValueError, match=message):
        OcclusionOptions.from_keywords(**keywords)


def test_devices_become_torch_devices_except_on_captums_path():
    options = OcclusionOptions.from_keywords(devices=["cpu", torch.device("cpu")])
    assert options.devices == (torch.device("cpu"), torch.device("cpu"))
    assert OcclusionOptions.from_keywords(devices=[], engine="captum").devices is None


@pytest.mark.parametrize(
    "keywords",
    [dict(tau=0.5), dict(drilldown=0.3, tau=0.5), dict(target_ssim=0.9), dict(region=(0, 0, 4, 4))],
)
def test_devices_take_the_approximations_and_region(keywords):
    options = OcclusionOptions.from_keywords(devices=["cpu", "cpu"], **keywords)
    assert options.devices == (torch.device("cpu"), torch.device("cpu"))


def test_drilldown_and_target_ssim_start_with_an_exact_pass():
    assert OcclusionOptions.from_keywords(tau=0.5).first_pass.tau == 0.5
    assert OcclusionOptions.from_keywords(tau=0.5, drilldown=0.3).first_pass.exact
    assert OcclusionOptions.from_keywords(target_ssim=0.9).first_pass.exact


def test_region_selects_the_windows_inside_it():
    grid = WindowGrid((3, 10, 10), (3, 4, 4), (1, 2, 2))  # 4 x 4 windows
    assert OcclusionOptions().window_ids(grid) is None
    ids = OcclusionOptions(region=(0, 0, 6, 6)).window_ids(grid)
    assert ids is not None and ids.tolist() == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="region must be 4 integers"):
        OcclusionOptions(region=(0, 0, 6)).window_ids(grid)
    with pytest.raises(ValueError, match="no window of the grid lies inside"):
        OcclusionOptions(region=(0, 0, 3, 3)).window_ids(grid)
    assert np.issubdtype(ids.dtype, np.integer)


@pytest.mark.parametrize("strides", [0, -1, (1, 0, 2), (1, 2.0, 2)])
def test_strides_must_be_positive_integers(strides):
    call = CaptumArguments(torch.randn(1, 3, 8, 8), (3, 2, 2), strides)
    with pytest.raises(ValueError, match="strides must be positive integers"):
        check_strides(call)


@pytest.mark.parametrize("keyword", ["devices", "on_progress"])
def test_attribute_stream_takes_neither_devices_nor_on_progress(keyword):
    stream = IncrementalOcclusion(models.small_cnn()).attribute_stream(
        torch.randn(1, 3, 8, 8), (3, 2, 2), target=0, **{keyword: None}
    )
    with pytest.raises(TypeError, match=keyword):
        next(stream)
