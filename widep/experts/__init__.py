"""Expert load: the recorded per-layer x per-expert token counts, what they mean for EP ranks, and EPLB advice.

``widep.experts.load`` reads and checks the file format, ``widep.experts.analysis`` is pure arithmetic on it
(balancedness, hottest experts, EPLB replay), ``widep.experts.cli`` is the ``widep experts`` command.
"""
