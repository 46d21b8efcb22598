"""One rule set per demo kind: rule name -> function (or "rule:reason" -> why it does not apply).

Rules run in the order of glmsetup.patch.engine.RULES; each returns the edited tree and records what
it changed, what was already there, and what it could not find.
"""
from __future__ import annotations

from glmsetup.patch import loading, rules_api, rules_cli, rules_gradio, rules_ptuning, rules_streamlit

_SHARED = {"model-path": loading.model_path, "loader": loading.loader}

RULE_SETS: dict[str, dict] = {
    "cli": {**_SHARED, **rules_cli.RULES},
    "gradio": {**_SHARED, **rules_gradio.RULES, "loader": rules_ptuning.loader},  # ptuning/web_demo.py too
    "streamlit": {**_SHARED, **rules_streamlit.RULES},
    "api": {**_SHARED, **rules_api.API_RULES},
    "openai-api": {**_SHARED, **rules_api.OPENAI_RULES},
    "utils": {
        "model-path:reason": "utils.py takes the path from its caller",
        "loader:reason": "utils.py is what the demos call; it loads nothing by itself",
        "repetition-penalty:reason": "utils.py does not generate",
        "compatibility:reason": "utils.py runs unchanged",
        "binding:reason": "utils.py does not listen on the network",
    },
}
