from releq_tvm.cli import main

main()
