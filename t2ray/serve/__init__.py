"""Ray Serve: a Dispatcher (OpenAI-compatible HTTP, pass 1) in front of ExpertModel replicas (pass 2).

- ``t2ray.serve.app``     the deployments and ``build_app(args)`` (a Serve config's ``import_path``), ``run_config``
- ``t2ray.serve.config``  the validated ``args`` (ServeArgs) and Serve config reading
- ``t2ray.serve.engine``  what a replica does, in plain PyTorch: mixtures -> z, batched step-wise decoding
- ``t2ray.serve.schema``  OpenAI request/response shapes; ``t2ray.serve.errors`` their error shape
"""
