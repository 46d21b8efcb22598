"""Files as users have them: CRLF clones, other encodings, hand edits, partial fixes, renamed copies."""
from __future__ import annotations

from glmsetup.patch.diff import unified

from .conftest import FIXTURES, MODEL, VARIANTS, plan, statuses


def test_crlf_survives_and_diff_matches_the_lf_one():
    lf = (FIXTURES / "web_demo.py").read_bytes()
    crlf = lf.replace(b"\n", b"\r\n")
    p_lf, p_crlf = plan(lf, name="web_demo.py"), plan(crlf, name="web_demo.py")
    assert p_crlf.new.count(b"\r\n") == p_crlf.new.count(b"\n")  # every line ending is CRLF, new lines too
    assert p_crlf.new == p_lf.new.replace(b"\n", b"\r\n")
    assert unified("w.py", p_crlf.original, p_crlf.new) == unified("w.py", p_lf.original, p_lf.new)
    assert plan(p_crlf.new, name="web_demo.py").new == p_crlf.new  # idempotent on CRLF too


def test_declared_encoding_and_comments_survive():
    text = ("# -*- coding: gbk -*-\n" + (FIXTURES / "cli_demo.py").read_text()
            .replace("User: ", "用户：").replace("# Several GPUs", "# 多显卡支持"))
    p = plan(text.encode("gbk"), name="cli_demo.py")
    new = p.new.decode("gbk")
    assert "用户：" in new and "# 多显卡支持" in new and "glmsetup.load_chat_model" in new
    compile(p.new, "cli_demo.py", "exec")


def test_utf8_bom_is_kept():
    src = b"\xef\xbb\xbf" + (FIXTURES / "api.py").read_bytes()
    p = plan(src, name="api.py")
    assert p.new.startswith(b"\xef\xbb\xbf") and p.changed


def test_user_edited_cli_demo_gets_what_still_matches():
    p = plan((VARIANTS / "cli_demo_edited.py").read_bytes(), name="cli_demo_edited.py")
    new = p.new.decode()
    s = statuses(p)
    assert s["model-path"] == "applied" and f'MODEL_PATH = "{MODEL}"' in new  # the variable both calls read
    assert "glmsetup.load_chat_model(MODEL_PATH, profile=\"cpu\")" in new
    assert s["compatibility"] == "already_applied"  # readline was guarded by hand
    assert "top_p=0.7" in new and "repetition_penalty=repetition_penalty_setting()" in new
    assert "用户：" in new


def test_gradio_demo_partly_fixed_by_hand():
    p = plan((VARIANTS / "web_demo_gradio4.py").read_bytes(), name="web_demo_gradio4.py")
    compat = next(r for r in p.results if r.rule == "compatibility")
    assert compat.status == "applied"
    assert compat.changes[0] == "Chatbot.postprocess override (postprocess) wrapped for Gradio >= 4 (messages format)"
    assert compat.changes[1].startswith("import mdtex2html only on Gradio < 4") and len(compat.changes) == 2
    new = p.new.decode()
    assert "inputs include" in " ".join(next(r for r in p.results if r.rule == "repetition-penalty").changes)
    assert 'container=False)' in new and new.count("container=False") == 1


def test_renamed_old_streamlit_demo():
    p = plan((VARIANTS / "old_web_demo2.py").read_bytes(), name="old_web_demo2.py")
    new = p.new.decode()
    assert statuses(p) == {"model-path": "applied", "loader": "applied", "repetition-penalty": "applied",
                           "compatibility": "applied", "binding": "not_applicable"}
    assert "@st.cache_resource\n" in new and "st.cache(" not in new
    assert "repetition_penalty=repetition_penalty" in new


def test_already_patched_by_hand_is_left_as_it_is():
    src = (VARIANTS / "api_patched_by_hand.py").read_bytes()
    p = plan(src, name="api_patched_by_hand.py", only=["model-path", "repetition-penalty", "binding"])
    assert not p.changed
    assert statuses(p) == {"model-path": "already_applied", "repetition-penalty": "already_applied",
                           "binding": "already_applied"}


def test_listen_binds_all_interfaces_and_warns():
    p = plan((FIXTURES / "openai_api.py").read_bytes(), name="openai_api.py", listen=True, only=["binding"])
    (r,) = p.results
    assert "host='0.0.0.0'" in p.new.decode() and 'allow_origins=["*"]' in p.new.decode()
    assert any("no API key" in n for n in r.notes)


def test_profile_ports_and_host_are_written(tmp_path):
    prof = tmp_path / "mine.toml"
    prof.write_text('inherits = "cpu"\n[server]\napi_port = 18123\nweb_port = 17860\n')
    api = plan((FIXTURES / "api.py").read_bytes(), name="api.py", profile=str(prof))
    assert "host='127.0.0.1', port=18123" in api.new.decode()
    assert f'profile="{prof}"' in api.new.decode()
    web = plan((FIXTURES / "web_demo.py").read_bytes(), name="web_demo.py", profile=str(prof))
    assert 'server_name="127.0.0.1", server_port=17860' in web.new.decode()


def test_switching_profile_updates_the_loader_line():
    first = plan((FIXTURES / "cli_demo.py").read_bytes(), name="cli_demo.py", profile="cpu")
    second = plan(first.new, name="cli_demo.py", profile="cpu-int4")
    assert 'profile="cpu-int4"' in second.new.decode() and statuses(second)["loader"] == "applied"
    added = [ln for ln in unified("c.py", first.new, second.new).splitlines() if ln.startswith("+") and ln[1:2] != "+"]
    assert added == ['+tokenizer, model = glmsetup.load_chat_model("/models/chatglm2-6b", profile="cpu-int4")']


def test_official_loader_on_a_glmsetup_patched_file_says_why_not():
    first = plan((FIXTURES / "cli_demo.py").read_bytes(), name="cli_demo.py")
    again = plan(first.new, name="cli_demo.py", loader="official", profile="cuda-fp16", only=["loader"])
    (r,) = again.results
    assert r.status == "not_applicable" and "--revert" in r.reason and not again.changed


def test_official_chains_follow_the_profile():
    src = (FIXTURES / "api.py").read_bytes()
    chains = {"cpu": ".float()", "cuda-fp16": ".half().cuda()", "cuda-int8": ".quantize(8).cuda()",
              "cuda-int4": ".quantize(4).cuda()", "mps": '.to("mps")'}
    for profile, chain in chains.items():
        p = plan(src, name="api.py", loader="official", profile=profile, only=["loader"])
        assert f'trust_remote_code=True){chain}\n' in p.new.decode(), profile
        back = plan(p.new, name="api.py", loader="official", profile=profile, only=["loader"])
        assert not back.changed and statuses(back)["loader"] == "already_applied"
    multi = plan(src, name="api.py", loader="official", profile="multi-gpu", only=["loader"])
    assert 'model = load_model_on_gpus("THUDM/chatglm2-6b", num_gpus=2)' in multi.new.decode()
    assert "from utils import load_model_on_gpus" in multi.new.decode()
    single = plan(multi.new, name="api.py", loader="official", profile="cuda-fp16", only=["loader"])
    assert 'AutoModel.from_pretrained("THUDM/chatglm2-6b", trust_remote_code=True).half().cuda()' in single.new.decode()


def test_api_switched_to_several_gpus_by_hand():
    """The official comment's three lines, uncommented: the path lives in a variable, the model in utils."""
    text = (FIXTURES / "api.py").read_text()
    head, tail = text.split("    tokenizer = AutoTokenizer", 1)
    tail = tail.split("\n", 2)[2]  # drop the two single-GPU lines
    tail = tail.replace("    # model_path", "    model_path").replace("    # tokenizer", "    tokenizer")
    tail = tail.replace("    # model = load", "    model = load")
    src = head.replace("import torch\n", "import torch\nfrom utils import load_model_on_gpus\n") + tail
    p = plan(src, name="api.py", profile="multi-gpu")
    new = p.new.decode()
    assert f'    model_path = "{MODEL}"' in new
    assert '    tokenizer, model = glmsetup.load_chat_model(model_path, profile="multi-gpu")' in new
    assert "load_model_on_gpus(model_path" not in new


def test_report_warns_when_the_model_folder_is_empty(tmp_path):
    from glmsetup.patch import patch_paths

    demo = tmp_path / "cli_demo.py"
    demo.write_bytes((FIXTURES / "cli_demo.py").read_bytes())
    report = patch_paths([demo], model=tmp_path / "nowhere", profile="cpu", dry_run=True)
    assert report["warnings"] and "glmsetup fetch --model-dir" in report["warnings"][0]


def test_cli_demo_reads_the_penalty_from_flag_or_environment(monkeypatch):
    import libcst as cst

    p = plan((FIXTURES / "cli_demo.py").read_bytes(), name="cli_demo.py")
    module = cst.parse_module(p.new)
    helper = next(s for s in module.body if isinstance(s, cst.FunctionDef) and s.name.value == "repetition_penalty_setting")
    ns: dict = {}
    exec("import os, sys\n" + module.code_for_node(helper), ns)
    setting = ns["repetition_penalty_setting"]
    monkeypatch.delenv("GLMSETUP_REPETITION_PENALTY", raising=False)
    cases = [(["cli_demo.py"], None, 1.0), (["cli_demo.py", "--repetition-penalty", "1.3"], None, 1.3),
             (["cli_demo.py", "--repetition-penalty=1.4"], "1.1", 1.4), (["cli_demo.py"], "1.7", 1.7),
             (["cli_demo.py", "--repetition-penalty", "0.1"], None, 0.5)]
    for argv, env, expected in cases:
        monkeypatch.setattr("sys.argv", argv)
        if env is None:
            monkeypatch.delenv("GLMSETUP_REPETITION_PENALTY", raising=False)
        else:
            monkeypatch.setenv("GLMSETUP_REPETITION_PENALTY", env)
        assert setting() == expected, (argv, env)
