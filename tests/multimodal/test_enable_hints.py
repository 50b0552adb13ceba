"""A refused image source says how the user of *this* front end turns the option on: the hint travels on the
policy (`ImageInputPolicy.enable_hints`, set by each front end), not by rewriting messages."""

from __future__ import annotations

import pytest

from xgenmm.cli.common import local_image_policy
from xgenmm.errors import ImageSourceNotAllowedError
from xgenmm.multimodal.image_sources import ImageInputPolicy, adapter_enable_hints, load_image
from xgenmm.server.config import ServerConfig


def refusal(policy: ImageInputPolicy, source: str) -> str:
    with pytest.raises(ImageSourceNotAllowedError) as info:
        load_image(source, policy)
    return str(info.value)


def test_the_core_names_its_own_option_by_default(tmp_path):
    assert "enable them with ImageInputPolicy(allow_local_files=True)" in refusal(ImageInputPolicy(),
                                                                                  str(tmp_path / "a.png"))
    assert "ImageInputPolicy(allow_remote_images=True)" in refusal(ImageInputPolicy(), "https://example.com/a.png")


@pytest.mark.parametrize("name", ["ChatXGenMM", "XGenMM"])
def test_adapters_name_their_own_field(tmp_path, name):
    policy = ImageInputPolicy().with_hints(adapter_enable_hints(name))
    local = refusal(policy, str(tmp_path / "a.png"))
    assert f"{name}(allow_local_files=True)" in local and "ImageInputPolicy" not in local
    assert f"{name}(allow_remote_images=True)" in refusal(policy, "https://example.com/a.png")


def test_http_clients_are_told_to_send_a_data_url(tmp_path):
    policy = ServerConfig().image_policy()
    local = refusal(policy, str(tmp_path / "a.png"))
    assert "data: URL" in local and "never reads files" in local and "ImageInputPolicy" not in local
    remote = refusal(policy, "https://example.com/a.png")
    assert "data: URL" in remote and "xgenmm serve --allow-remote-images" in remote


def test_the_command_line_says_to_pass_a_path(tmp_path):
    remote = refusal(local_image_policy([tmp_path / "a.png"]), "https://example.com/a.png")
    assert "pass its path" in remote and "ImageInputPolicy" not in remote


def test_hints_do_not_change_what_a_policy_allows():
    base = ImageInputPolicy(allow_remote_images=True)
    hinted = base.with_hints(adapter_enable_hints("XGenMM"))
    assert hinted == base and hinted.how_to_enable("allow_local_files") != base.how_to_enable("allow_local_files")
