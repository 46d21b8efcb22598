"""What `glmsetup run` and `glmsetup selftest` do, below the Click layer.

binding   where a server listens, and the rules that keep it from being exposed by accident
plan      the run plan: resolved profile, checked model folder, memory estimate, bind address
loading   the banner printed first and the model load with its progress display
serve     starting each front end (cli, web, streamlit, api) in this process or as `streamlit run`
official  the official demo folder, copied under GLMSETUP_HOME, patched there and launched
vllm      the `vllm serve` command line on the converted model folder
selftest  the tiny-checkpoint end-to-end check of every front end

Nothing here imports torch at module level: the runtime is reached through glmsetup.load_chat_model.
"""
