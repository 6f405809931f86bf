"""The split server: the middle blocks of a split model and their LoRA, serving many devices over MQTT.

Needs torch (it runs the blocks); imports ``fedmq_protocol`` and the model-splitting code of
``edge_agent`` (``edge_agent.methods.split_model``), never ``broker_coordinator``.
"""
