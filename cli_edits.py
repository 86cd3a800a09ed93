EDITS = [
('from shardline.launcher.output import ChildOutput\n','from shardline.launcher.output import ChildOutput\nfrom shardline.launcher.ports import check_ports_free\n'),
('    try:\n        model_dir = ','    try:\n        check_ports_free(args)\n        model_dir = '),
]
