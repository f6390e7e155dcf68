"""Hardware targets: the schema and YAML loader (:mod:`.spec`) and where shipped files live (:mod:`.files`)."""

from .spec import (  # noqa: F401  (the public names, re-exported)
    ChannelShape, BlockShape, HeadShape, GroupShape, OrtRuntime, TvmRuntime, RpcEndpoint, Device,
    LatencySettings, Target, MAX_TARGET_BYTES, check_int, parse_target, find_target, load_target,
    list_targets, host_arch, host_description, this_machine,
)
