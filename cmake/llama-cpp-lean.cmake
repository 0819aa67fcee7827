# Run at the end of every project() call of llama-cpp-python's build (the Makefile passes it as
# CMAKE_PROJECT_INCLUDE). llama-cpp-python forces llama.cpp's "common" library on, but its Python
# bindings load only libllama and ggml; common (argument parsing, chat templates, JSON) is a large
# share of the compile time and nothing pacore runs uses it.
if(PROJECT_NAME STREQUAL "llama.cpp")
    set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp common library (unused by the Python bindings)" FORCE)
endif()
