from memlimits_async.cli import console_main

console_main()
