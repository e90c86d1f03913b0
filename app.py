"""ChatEXAONEPath Gradio app (Spaces-style entry point).

The chat app — upload a whole-slide image, see the tissue and attention, and chat about it — is
built by the app issue ("The chat app: a pathologist uploads a whole-slide image and talks about
it"), once the model exists. Until then this entry point says so and runs the vision-tower demo.
"""

from chatexaonepath.cli import main

if __name__ == "__main__":
    import sys

    sys.stderr.write("The chat app is not built yet (see the app issue); running the vision-tower demo instead.\n")
    sys.argv = [sys.argv[0], "demo"]
    main()
