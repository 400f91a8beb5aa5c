"""Saved policies load without running code of their files (issue 19, item 5).

The safe format is ``policy.pt`` (a torch state dict read with ``weights_only=True``) plus the
``network`` section of ``policy.json``; an SB3 ``model.zip`` needs pickle and is refused unless
the user trusts it (``policy:pickle:PATH``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from twinloop.cli.main import main
from twinloop.plant.glucose.patients import get_patient
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.controllers import make_controller
from twinloop.policies.glucose.learned import load_policy_controller
from twinloop.policies.knee.learned import load_exo_policy
from twinloop.policies.saved import (
    MODEL_FILE,
    WEIGHTS_FILE,
    PickleTrustWarning,
    clear_model_cache,
    load_model,
    policy_paths,
    shipped_policies,
)

RECORDED = Path(__file__).parent / "data" / "shipped_actions.json"


class _WritesMarker:
    """Unpickling this creates the file ``marker`` (what a hostile archive would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _hostile_sb3_zip(path: Path, marker: Path) -> None:
    """An SB3 archive whose ``data`` holds a cloudpickled object that creates ``marker``."""
    payload = base64.b64encode(pickle.dumps(_WritesMarker(marker))).decode()
    data = {"policy_class": {":type:": "<class 'x'>", ":serialized:": payload}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data", json.dumps(data))
        archive.writestr("_stable_baselines3_version", "2.9.2")


def _policy_dir(tmp_path: Path, name: str = "t1d_ppo") -> Path:
    """A copy of a shipped policy in ``tmp_path/name``."""
    d = tmp_path / name
    shutil.copytree(shipped_policies()[name], d)
    return d


def _pickle_only(d: Path) -> dict[str, Any]:
    """Make ``d`` a policy that has only an SB3 archive (no weights, no network section)."""
    (d / WEIGHTS_FILE).unlink()
    meta = json.loads((d / "policy.json").read_text())
    del meta["network"]
    (d / "policy.json").write_text(json.dumps(meta))
    return meta


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_model_cache()


@pytest.mark.parametrize("name", ["t1d_ppo", "knee_sac"])
def test_the_shipped_policies_load_safely_and_act_as_their_former_archives(name: str) -> None:
    _, model_path = policy_paths(name)
    assert model_path.name == WEIGHTS_FILE and not (model_path.parent / MODEL_FILE).exists()
    recorded = json.loads(RECORDED.read_text())[name]
    if name == "t1d_ppo":
        model = load_policy_controller(name, get_patient("adult#001")).model
    else:
        model = load_exo_policy(name, control_hz=100).model
    assert type(model).__name__ in ("ActorCriticPolicy", "SACPolicy")
    obs = np.asarray(recorded["observations"], dtype=np.float32)
    actions = np.stack([model.predict(o, deterministic=True)[0] for o in obs])
    np.testing.assert_allclose(actions, np.asarray(recorded["actions"]), rtol=0, atol=1e-6)


def test_a_hostile_model_zip_is_refused_without_running_it(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path)
    _pickle_only(d)
    marker = tmp_path / "pwned"
    _hostile_sb3_zip(d / MODEL_FILE, marker)
    patient = get_patient("adult#001")
    with pytest.raises(PolicyConfigError, match="needs pickle"):
        make_controller(f"policy:{d}", patient)
    with pytest.raises(PolicyConfigError, match="needs pickle"):
        load_policy_controller(d / MODEL_FILE, patient)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--placement", "inline", "--patient", "adult#001", "--days", "1",
                     "--no-progress", "--controller", f"policy:{d}",
                     "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    assert "needs pickle" in err.getvalue() and "Traceback" not in err.getvalue()
    assert not marker.exists()
    # the archive is really hostile: trusting it runs its code (then SB3 fails on the rest)
    with pytest.warns(PickleTrustWarning), pytest.raises(PolicyConfigError, match="cannot load"):
        make_controller(f"policy:pickle:{d}", patient)
    assert marker.exists()


def test_hostile_weights_are_refused_without_running_them(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"x": _WritesMarker(marker)}, d / WEIGHTS_FILE)
    with pytest.raises(PolicyConfigError, match=r"cannot load .* safely"):
        make_controller(f"policy:{d}", get_patient("adult#001"))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("class", "builtins.eval", "network.class"),
        ("activation_fn", "Module", "network.activation_fn"),
        ("features_extractor", "os.system", "network.features_extractor"),
        ("kwargs", {"lr_schedule": "x"}, "network.kwargs"),
        ("observation_space", {"shape": [10**9]}, "network.observation_space"),
        ("action_space", "Discrete(3)", "network.action_space"),
    ],
)
def test_a_network_section_names_only_allowed_classes_and_values(
    tmp_path: Path, field: str, value: object, needle: str
) -> None:
    d = _policy_dir(tmp_path)
    meta = json.loads((d / "policy.json").read_text())
    meta["network"][field] = value
    (d / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyConfigError, match=needle):
        make_controller(f"policy:{d}", get_patient("adult#001"))


def _sb3_archive_of_shipped(d: Path) -> None:
    """Write a genuine SB3 ``model.zip`` holding the shipped t1d policy's weights."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    safe = load_model("ppo", d / WEIGHTS_FILE, "shipped")

    class _Spaces(gym.Env[Any, Any]):
        observation_space = safe.observation_space
        action_space = safe.action_space

    model = PPO("MlpPolicy", _Spaces(), policy_kwargs={"net_arch": [64, 64],
                "activation_fn": torch.nn.Tanh, "log_std_init": -1.0}, device="cpu")  # fmt: skip
    model.policy.load_state_dict(safe.state_dict())
    model.save(str(d / MODEL_FILE))


def test_a_trusted_sb3_archive_loads_with_a_warning_and_acts_the_same(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path)
    _sb3_archive_of_shipped(d)
    patient = get_patient("adult#001")
    safe = make_controller(f"policy:{d}", patient)
    _pickle_only(d)
    clear_model_cache()
    with pytest.raises(PolicyConfigError, match="needs pickle"):
        make_controller(f"policy:{d}", patient)
    with pytest.warns(PickleTrustWarning, match="trusted"):
        trusted = make_controller(f"policy:pickle:{d}", patient)
    assert trusted.model_trust_pickle and type(trusted.model).__name__ == "PPO"
    obs = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    for o in obs:
        a = safe.model.predict(o, deterministic=True)[0]  # type: ignore[attr-defined]
        b = trusted.model.predict(o, deterministic=True)[0]  # type: ignore[attr-defined]
        np.testing.assert_array_equal(a, b)
    # a copy sent to another process reloads it, still trusted and silently (warned once)
    clear_model_cache()
    copy = pickle.loads(pickle.dumps(trusted))
    assert type(copy.model).__name__ == "PPO"
