"""Settings: one validated object per process, from a TOML file, the environment and flags.

* ``loader`` -- :func:`load_settings` (defaults < TOML file < environment < flags), :class:`SettingsError`
  and the checks a settings class's ``validate`` uses (:func:`choice`, :func:`positive`, :func:`user_path`)
* ``broker`` -- :class:`BrokerSettings` (how a process reaches the broker: the part the agent and the hub
  share), :class:`BrokerURL`, :class:`TLSFiles`
* ``agent``  -- :class:`AgentSettings` (the edge agent's settings) and the parsers of its sensor keys
  (:func:`channel_specs`, :func:`field_path`, :func:`topic_filter`, :func:`device_template`)

The hub's settings (:mod:`cloud_hub.settings`) are built on ``loader`` and ``broker``.
"""
