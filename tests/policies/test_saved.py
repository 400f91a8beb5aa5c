"""The saved-policy format's names: shipped policies are found by name (policy:knee_sac)."""

from __future__ import annotations

import pytest

from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.saved import policy_paths, read_metadata_file, shipped_policies


def test_shipped_policies_are_found_by_name(tmp_path):
    shipped = shipped_policies()
    assert {"knee_sac", "t1d_ppo", "knee_sac/seed_0", "t1d_ppo/seed_0"} <= set(shipped)
    assert shipped["knee_sac"] == shipped["knee_sac/seed_0"]
    meta, model = policy_paths("knee_sac")
    assert meta.is_file() and model.is_file()
    assert read_metadata_file("t1d_ppo")["env_id"] == "twinloop/T1D-v0"
    assert read_metadata_file("knee_sac")["env_id"] == "twinloop/KneeExo-v0"
    (tmp_path / "knee_sac").mkdir()  # a directory of that name where the user is wins
    assert policy_paths(tmp_path / "knee_sac")[0] == tmp_path / "knee_sac" / "policy.json"
    with pytest.raises(PolicyConfigError, match="nor a shipped policy \\(knee_sac, t1d_ppo\\)"):
        policy_paths("no_such_policy")
