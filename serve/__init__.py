"""The endpoint: Azure ML scoring script (score.py) and the modules it ships with.

Everything here except codefolder.py is copied into the endpoint's code folder
(see codefolder.build_code_folder), so it imports only the standard library, torch, transformers,
the inference server and stages/core/{chat,pii,generate}.py.
"""
