"""How benchmarks/serving.py drives each system: the streaming HTTP client and closed loop
(clients.py), server launchers (launch.py), and the drivers that run without our HTTP client
(inprocess.py, llamacpp_batched.py) or stand in for a naive server (transformers_server.py)."""
