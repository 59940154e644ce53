"""model.backbone.weights=imagenet / an http(s) URL: fetched with torch.hub's own download into a
temporary TORCH_HOME, from a loopback HTTP server (no internet): the served tensors are loaded,
the second construction reads the cache, a file whose sha256 does not match its name, a host with
nothing listening, a server that never answers and an arch without a checkpoint each give one
line naming the key, and leave nothing in the cache."""
from __future__ import annotations

import hashlib
import http.server
import logging
import socket
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from freqexp.errors import ConfigError
from freqexp.models import backbone as bb
from freqexp.models.backbone import ARCHS, IMAGENET_URLS, WEIGHTS_TIMEOUT_ENV, WEIGHTS_URL_ENV, FeatureExtractor, ResNet
from freqexp.models.memory_bank import PatchCore

KEY = "model.backbone.weights"
SMALL = dict(input_size=32, center_crop=None, feature_reduction="avgpool", feature_dim=16, pretrain_dim=16, projection_dim=8,
             smooth_sigma=0.0)
PARAMS = ("conv1.weight", "bn1.running_mean", "layer2.0.downsample.0.weight", "layer3.1.conv2.weight")


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving `root`, counting the requests it gets."""

    def __init__(self, root: Path):
        self.root, self.requests = root, []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's hub cache inside the test's temp dir (never the user's); no mirror set."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_URL_ENV, raising=False)
    monkeypatch.delenv(WEIGHTS_TIMEOUT_ENV, raising=False)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    assert tmp_path in cache.parents  # a torch.hub.set_dir elsewhere would send downloads to the real cache
    return cache


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    s = Server(root)
    yield s
    s.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A resnet18 state dict (seeded) as bytes, with the first 8 hex digits of its sha256."""
    torch.manual_seed(7)
    state = ResNet("resnet18").state_dict()
    path = tmp_path_factory.mktemp("checkpoint") / "r18.pth"
    torch.save(state, path)
    data = path.read_bytes()
    return state, data, hashlib.sha256(data).hexdigest()[:8]


def serve_as_imagenet(monkeypatch, server, data: bytes, name: str) -> None:
    """Serve `data` as `name` and make it resnet18's ImageNet checkpoint, reached through the mirror variable."""
    (server.root / name).write_bytes(data)
    monkeypatch.setitem(IMAGENET_URLS, "resnet18", f"https://download.pytorch.org/models/{name}")
    monkeypatch.setenv(WEIGHTS_URL_ENV, server.url + "/")


def one_line_error(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert err.value.key == KEY and text.startswith(KEY + ": ") and "\n" not in text
    return text


def test_url_table_is_torchvisions_imagenet1k_v1_for_every_arch():
    # torchvision/models/resnet.py: ResNet18_Weights, ResNet50_Weights, Wide_ResNet50_2_Weights .IMAGENET1K_V1
    assert IMAGENET_URLS == {
        "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    }
    assert set(IMAGENET_URLS) == set(ARCHS)
    assert all(torch.hub.HASH_REGEX.search(url.rsplit("/", 1)[1]).group(1) for url in IMAGENET_URLS.values())


def test_imagenet_downloads_once_into_the_hub_cache_and_loads_the_served_tensors(hub, server, checkpoint, monkeypatch, caplog):
    state, data, digest = checkpoint
    name = f"resnet18-{digest}.pth"
    serve_as_imagenet(monkeypatch, server, data, name)
    torch.manual_seed(99)  # another random init, which the served file must replace
    with caplog.at_level(logging.INFO, logger="freqexp"):
        model = PatchCore((1, 32, 32), backbone={"arch": "resnet18", "weights": "imagenet"}, **SMALL)
    got = model.extractor.net.state_dict()
    for p in PARAMS:
        assert torch.equal(got[p], state[p]), p
    assert server.requests == [f"/{name}"]
    assert sorted(f.name for f in hub.iterdir()) == [name] and (hub / name).read_bytes() == data
    assert sum("downloading" in r.getMessage() and name in r.getMessage() for r in caplog.records) == 1
    assert "random weights" not in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="freqexp"):
        again = FeatureExtractor((1, 32, 32), ["layer2", "layer3"], {"arch": "resnet18", "weights": "imagenet"}, input_size=32)
    assert len(server.requests) == 1 and "downloading" not in caplog.text  # read from the cache
    assert torch.equal(again.net.state_dict()["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])


def test_a_url_is_downloaded_and_checked_too(hub, server, checkpoint):
    state, data, digest = checkpoint
    (server.root / f"mine-{digest}.pth").write_bytes(data)
    ext = FeatureExtractor((1, 32, 32), ["layer2"], {"arch": "resnet18", "weights": f"{server.url}/mine-{digest}.pth"}, input_size=32)
    assert torch.equal(ext.net.state_dict()["conv1.weight"], state["conv1.weight"])
    assert (hub / f"mine-{digest}.pth").is_file()

    with pytest.raises(ConfigError) as err:
        FeatureExtractor((1, 32, 32), ["layer2"], {"arch": "resnet18", "weights": f"{server.url}/absent.pth"}, input_size=32)
    text = one_line_error(err)
    assert f"cannot download {server.url}/absent.pth (HTTP 404 " in text and WEIGHTS_URL_ENV in text
    assert not (hub / "absent.pth").exists()


def test_a_file_whose_hash_does_not_match_its_name_is_refused_and_not_cached(hub, server, checkpoint, monkeypatch):
    _, data, digest = checkpoint
    wrong = "0" * 8 if digest != "0" * 8 else "1" * 8
    serve_as_imagenet(monkeypatch, server, data, f"resnet18-{wrong}.pth")
    with pytest.raises(ConfigError) as err:
        FeatureExtractor((1, 32, 32), ["layer2"], {"arch": "resnet18", "weights": "imagenet"}, input_size=32)
    text = one_line_error(err)
    assert f"resnet18-{wrong}.pth is not the expected file" in text and f"does not start with {wrong}" in text
    assert len(server.requests) == 1  # it was downloaded, then thrown away
    assert list(hub.iterdir()) == []  # neither the file nor torch's .partial temporary


def test_a_host_with_nothing_listening_fails_fast_with_one_line(hub, monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(WEIGHTS_URL_ENV, f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        bb.resolve_weights("imagenet", "wide_resnet50_2")  # what FeatureExtractor calls, without building the big net
    assert time.monotonic() - start < 5
    text = one_line_error(err)
    assert text.startswith(f"{KEY}: cannot download http://127.0.0.1:{port}/wide_resnet50_2-95faca4d.pth (")
    assert "download it elsewhere and pass its path, or set FREQEXP_WEIGHTS_URL" in text
    assert list(hub.iterdir()) == []


def test_a_server_that_never_answers_times_out(hub, monkeypatch):
    previous = socket.getdefaulttimeout()
    with socket.socket() as s:  # accepts connections (kernel backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        monkeypatch.setenv(WEIGHTS_URL_ENV, f"http://127.0.0.1:{s.getsockname()[1]}")
        monkeypatch.setenv(WEIGHTS_TIMEOUT_ENV, "0.5")
        start = time.monotonic()
        with pytest.raises(ConfigError) as err:
            FeatureExtractor((1, 32, 32), ["layer2"], {"arch": "resnet18", "weights": "imagenet"}, input_size=32)
        assert time.monotonic() - start < 5
    assert "(no answer within 0.5 s)" in one_line_error(err)
    assert socket.getdefaulttimeout() == previous  # the temporary default is put back
    assert list(hub.iterdir()) == []


def test_an_arch_without_a_checkpoint_is_a_config_error(hub, server, monkeypatch):
    monkeypatch.delitem(IMAGENET_URLS, "resnet50")
    monkeypatch.setenv(WEIGHTS_URL_ENV, server.url)
    with pytest.raises(ConfigError) as err:
        FeatureExtractor((1, 32, 32), ["layer2"], {"arch": "resnet50", "weights": "imagenet"}, input_size=32)
    assert "no torchvision ImageNet checkpoint known for arch 'resnet50'" in one_line_error(err)
    assert server.requests == []
    with pytest.raises(ConfigError) as err:
        bb.imagenet_url("resnet34")
    assert err.value.key == KEY
