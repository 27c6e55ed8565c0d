"""Which model ships.

- :mod:`~d2ops.registry.gate`: the quality floor and the champion/challenger decision (pure functions);
- :mod:`~d2ops.registry.champion`: where the champion lives (the ``ChampionStore`` protocol, the local store).
"""
