"""The endpoint: Azure ML scoring script (score.py) and the modules it ships with.

Everything here except codefolder.py is copied into the endpoint's code folder
(see codefolder.build_code_folder), so it imports only the standard library, torch, transformers,
the inference server and stages/core/{chat,pii,generate}.py.
"""

# Response header carrying SERVE_INSTANCE_ID, the id its starter gave the server process
# (serve/score.py sets it; stages/deploy.py checks it).
INSTANCE_HEADER = "x-serve-instance"
