"""The two front doors, SMPP and HTTP. Both build a Message and call
Engine.accept; neither knows carriers."""
