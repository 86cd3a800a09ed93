import json
spec = json.load(open("/tmp/mine/c3.json"))
work = open("launcher/commands.py").read()
i = work.index("\n\ndef _kernel_options"); j = work.index("def shard_env(")
helpers = work[i:j]
spec["edits"]["launcher/commands.py"] = [
 ['''                ("--attention", args.attention),
                ("--cuda-graphs", args.cuda_graphs),
''', '''                *_kernel_options(args),
'''],
 ['''    env = shard_env(environ, rank, args.num_shard, args.master_addr, args.master_port)
    return ChildSpec(name=f"shard {rank}", argv=argv, env=env, rank=rank)
''', '''    env = shard_env(environ, rank, args.num_shard, args.master_addr, args.master_port)
    env.update(_watermark_env(args))
    return ChildSpec(name=f"shard {rank}", argv=argv, env=env, rank=rank)''' + helpers.rstrip("\n") + "\n"],
 ['''                ("--json-output", args.json_output),
                ("--shutdown-timeout", args.graceful_termination_timeout),
''', '''                ("--json-output", args.json_output),
                ("--otlp-endpoint", args.otlp_endpoint),
                ("--otlp-service-name", args.otlp_service_name),
                *(("--cors-allow-origin", origin) for origin in args.cors_allow_origin or ()),
                ("--shutdown-timeout", args.graceful_termination_timeout),
'''],
]
spec["edits"]["launcher/cli.py"] = [
 ['''    if args.trust_remote_code:
        logger.warning("--trust-remote-code has no effect: Shardline runs its own model code only")
''', '''    if args.trust_remote_code:
        logger.warning("--trust-remote-code has no effect: Shardline runs its own model code only")
    if args.max_input_length is not None:
        logger.warning("--max-input-length (MAX_INPUT_LENGTH) is deprecated: use --max-input-tokens")
'''],
]
spec["whole"] = ["tests/test_launcher_flags.py"]
json.dump(spec, open("/tmp/mine/c4.json", "w"))
