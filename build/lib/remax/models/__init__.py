"""Policy and reward models: loading by HF name or local path, or a tiny random-init one."""
