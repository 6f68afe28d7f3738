# Development environment targets (issue 5). Included by the Makefile.
