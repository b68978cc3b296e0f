// Loads a SavedModel the way TF Serving does and runs one of its signatures.
//
//   serving_check EXPORT_DIR SIGNATURE INPUTS OUTPUTS
//
// INPUTS and OUTPUTS are TFRecord files of serialized tensorflow.NamedTensorProto,
// one record per signature input/output, keyed by the signature's names.
// tfmm.serving.check builds this program against the tensorflow wheel and
// compares its outputs with Python's. Exit status: 0 ok, 1 usage, 2 load
// failure, 3 bad inputs, 4 run failure, 5 cannot write outputs; the reason
// goes to stderr.

#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/lib/io/record_reader.h"
#include "tensorflow/core/lib/io/record_writer.h"
#include "tensorflow/core/platform/env.h"
#include "tensorflow/core/protobuf/named_tensor.pb.h"

namespace {

int Fail(int code, const std::string& what, const absl::Status& status) {
  std::cerr << "serving_check: " << what << ": " << status.ToString() << std::endl;
  return code;
}

int Fail(int code, const std::string& what) {
  std::cerr << "serving_check: " << what << std::endl;
  return code;
}

absl::Status ReadInputs(const std::string& path,
                        std::map<std::string, tensorflow::Tensor>* inputs) {
  std::unique_ptr<tensorflow::RandomAccessFile> file;
  TF_RETURN_IF_ERROR(tensorflow::Env::Default()->NewRandomAccessFile(path, &file));
  tensorflow::io::SequentialRecordReader reader(file.get());
  tensorflow::tstring record;
  while (true) {
    absl::Status status = reader.ReadRecord(&record);
    if (absl::IsOutOfRange(status)) return absl::OkStatus();  // end of file
    TF_RETURN_IF_ERROR(status);
    tensorflow::NamedTensorProto named;
    if (!named.ParseFromString(std::string(record))) {
      return absl::InvalidArgumentError("a record is not a NamedTensorProto");
    }
    tensorflow::Tensor tensor;
    if (!tensor.FromProto(named.tensor())) {
      return absl::InvalidArgumentError("input '" + named.name() + "' is not a valid TensorProto");
    }
    (*inputs)[named.name()] = std::move(tensor);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) return Fail(1, "usage: serving_check EXPORT_DIR SIGNATURE INPUTS OUTPUTS");
  const std::string export_dir = argv[1], signature_name = argv[2];

  // The same loader and tag as TF Serving's SavedModelBundle source adapter.
  tensorflow::SavedModelBundle bundle;
  absl::Status status = tensorflow::LoadSavedModel(
      tensorflow::SessionOptions(), tensorflow::RunOptions(), export_dir,
      {"serve"}, &bundle);
  if (!status.ok()) return Fail(2, "cannot load " + export_dir + " with tag 'serve'", status);

  const auto& signatures = bundle.meta_graph_def.signature_def();
  auto found = signatures.find(signature_name);
  if (found == signatures.end()) {
    std::string names;
    for (const auto& entry : signatures) names += " " + entry.first;
    return Fail(2, export_dir + " has no signature '" + signature_name + "'; it has:" + names);
  }
  const tensorflow::SignatureDef& signature = found->second;

  std::map<std::string, tensorflow::Tensor> given;
  status = ReadInputs(argv[3], &given);
  if (!status.ok()) return Fail(3, std::string("cannot read inputs ") + argv[3], status);

  std::vector<std::pair<std::string, tensorflow::Tensor>> feeds;
  std::set<std::string> used;
  for (const auto& [name, info] : signature.inputs()) {
    auto input = given.find(name);
    if (input == given.end()) return Fail(3, "signature input '" + name + "' was not given");
    if (input->second.dtype() != info.dtype()) {
      return Fail(3, "input '" + name + "' is " +
                         tensorflow::DataTypeString(input->second.dtype()) +
                         ", the signature wants " + tensorflow::DataTypeString(info.dtype()));
    }
    feeds.emplace_back(info.name(), input->second);
    used.insert(name);
  }
  for (const auto& entry : given) {
    if (!used.count(entry.first)) {
      return Fail(3, "input '" + entry.first + "' is not in signature '" + signature_name + "'");
    }
  }

  std::vector<std::string> output_keys, fetches;
  for (const auto& [name, info] : signature.outputs()) {
    output_keys.push_back(name);
    fetches.push_back(info.name());
  }
  // Ops inside the graph's functions resolve only here (e.g. a py_function's
  // EagerPyFunc has no kernel outside Python), so running is the real test.
  std::vector<tensorflow::Tensor> outputs;
  status = bundle.session->Run(feeds, fetches, {}, &outputs);
  if (!status.ok()) return Fail(4, "running signature '" + signature_name + "' failed", status);

  std::unique_ptr<tensorflow::WritableFile> file;
  status = tensorflow::Env::Default()->NewWritableFile(argv[4], &file);
  if (!status.ok()) return Fail(5, std::string("cannot write ") + argv[4], status);
  tensorflow::io::RecordWriter writer(file.get());
  for (size_t i = 0; i < outputs.size(); ++i) {
    tensorflow::NamedTensorProto named;
    named.set_name(output_keys[i]);
    outputs[i].AsProtoTensorContent(named.mutable_tensor());
    status = writer.WriteRecord(named.SerializeAsString());
    if (!status.ok()) return Fail(5, std::string("cannot write ") + argv[4], status);
  }
  status = writer.Close();
  if (status.ok()) status = file->Close();
  if (!status.ok()) return Fail(5, std::string("cannot write ") + argv[4], status);
  return 0;
}
